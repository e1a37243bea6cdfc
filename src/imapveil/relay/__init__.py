"""The trio shell around the protocol core: sockets, timeouts, backpressure, shutdown."""
