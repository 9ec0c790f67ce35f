"""What every layer uses, without Ray or torch: the one-line error, atomic files, the console, the command line."""
