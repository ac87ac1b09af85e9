"""What the tests share: one engine-on-a-socket server, raw clients that let a test choose every
byte, NTLM message crafting, the lab's cast and config helpers, and the reference captures.

Test modules import from here and never from each other.
"""
