"""Everything that shards a built model or sets up process groups. Models know nothing of it."""
