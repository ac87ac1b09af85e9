"""The live view: `rpcauth serve --ui`, a web page that draws each logon as the server sees it.

address.py (where to listen, the token rule), live.py (connection views built from the server's
events), broadcast.py (Server-Sent Events to every open page, bounded), forms.py (server-side
checks of what a page sends), runs.py (matrix rows and what-if cases run by the synthetic
client), labview.py (the lab as the page shows it, without secrets), app.py (the aiohttp
application on the listeners' event loop) and assets/ (the page: HTML, CSS, plain JavaScript).
"""

from .address import UiAddress, parse_address

__all__ = ["UiAddress", "parse_address"]
