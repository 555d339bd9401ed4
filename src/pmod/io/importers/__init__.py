"""Importers of checkpoints saved by other code bases."""
