"""Kerberos in the lab: a private MIT realm (realm.py, ntkeys.py) and the GSS-API acceptor that
checks its tickets (acceptor.py). See docs/kerberos.md."""
