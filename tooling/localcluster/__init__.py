"""The local cluster behind ``warmserve up``: embedded NATS and Postgres, then the five services."""
