"""The `tessera` command line and what its subcommands print (status, summary, estimate)."""
