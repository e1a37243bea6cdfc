"""Usage statistics: which clients, versions and systems are in use, by how many people."""
