"""PostgreSQL: migrations, connections and the batch repositories."""
