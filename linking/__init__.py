"""The linking room: reading mail (headers, forwards, reply text) and recording it on the right
persons, deals and threads, through the one capture path (``linking.capture``). Pure: no
sockets; it imports only the store and the ground (docs/architecture.md).
"""
