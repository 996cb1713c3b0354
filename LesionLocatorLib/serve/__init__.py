"""The inference server, its client and the wire format between them."""
