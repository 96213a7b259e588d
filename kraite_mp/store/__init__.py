"""PostgreSQL: connections and migrations, and one module per table family."""
