#!/bin/sh
# Runs once, when the pgvector/pgvector container initialises an empty data folder (docker-entrypoint-initdb.d):
# the vector extension, and the role the workers connect as. That role owns the tables the workers create but
# is neither a superuser nor BYPASSRLS, so the tenant row-level security policies bind it.
set -eu
psql -v ON_ERROR_STOP=1 -v app_password="$PGVECTOR_APP_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE EXTENSION IF NOT EXISTS vector;
CREATE ROLE vectorstream LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD :'app_password';
GRANT CONNECT, CREATE ON DATABASE vectorstream TO vectorstream;
GRANT USAGE, CREATE ON SCHEMA public TO vectorstream;
SQL
