"""imapveil: a transparent IMAP proxy that learns which mail clients are in use."""

__version__ = "0.1.0"
