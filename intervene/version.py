"""The package's version, in a module of its own so that any layer can read it without importing the
package facade (``intervene/__init__``) above it."""

__version__ = "0.1.0"
