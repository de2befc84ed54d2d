"""One module per CLI verb. Each parses its arguments, calls one library function, prints."""
