"""The sans-IO protocol core: bytes and the time go in, actions come out.

Nothing in this package imports trio, socket, ssl or logging, reads a clock or touches a file.
"""
