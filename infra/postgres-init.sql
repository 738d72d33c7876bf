-- The compose file's PostgreSQL creates the `mlflow` database itself; Prefect gets its own.
CREATE DATABASE prefect OWNER shrinkfleet;
