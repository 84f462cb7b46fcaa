"""Events: the schema of the feed, the durable SQLite store, and the fan-out hub with replay."""
