"""The proxy over real sockets, and its protocols driven without sockets
(``test_protocol_*``)."""
