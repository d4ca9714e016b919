"""One module per decoding mode; each defines State, init, step, done and run."""
