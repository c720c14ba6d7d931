-- One login role and one database per service, each database reachable only
-- by its owner (and superusers). Run once per cluster as a superuser (or a
-- role with CREATEROLE and CREATEDB); safe to re-run: existing roles and
-- databases are kept and the passwords are (re)set, so it also rotates them.
--
--   psql "host=db.example.internal user=postgres sslmode=require" \
--     -v ON_ERROR_STOP=1 \
--     -v orchestrator_password="$ORCHESTRATOR_DB_PASSWORD" \
--     -v inventory_password="$INVENTORY_DB_PASSWORD" \
--     -v payment_password="$PAYMENT_DB_PASSWORD" \
--     -v shipping_password="$SHIPPING_DB_PASSWORD" \
--     -f deploy/postgres/init.sql
--
-- Optional: -v prefix=xyz_ replaces the default name prefix "saga_" (roles
-- and databases become xyz_orchestrator ...), e.g. for a throwaway test run.
--
-- The passwords travel in ALTER ROLE statements: keep log_statement below
-- 'ddl' while this runs, or the server log will hold them. With the default
-- password_encryption (scram-sha-256) only the verifier is stored.
-- Each service then connects with
--   DATABASE_URL=postgres://saga_payment:PASSWORD@HOST:5432/saga_payment?sslmode=require
-- and runs its own migrations as the owner of its database.

\set ON_ERROR_STOP on

\if :{?prefix}
\else
  \set prefix saga_
\endif

\if :{?orchestrator_password}
\else
  \warn 'init.sql: pass -v orchestrator_password=...'
  DO $$ BEGIN RAISE EXCEPTION 'missing psql variable orchestrator_password'; END $$;
\endif
\if :{?inventory_password}
\else
  \warn 'init.sql: pass -v inventory_password=...'
  DO $$ BEGIN RAISE EXCEPTION 'missing psql variable inventory_password'; END $$;
\endif
\if :{?payment_password}
\else
  \warn 'init.sql: pass -v payment_password=...'
  DO $$ BEGIN RAISE EXCEPTION 'missing psql variable payment_password'; END $$;
\endif
\if :{?shipping_password}
\else
  \warn 'init.sql: pass -v shipping_password=...'
  DO $$ BEGIN RAISE EXCEPTION 'missing psql variable shipping_password'; END $$;
\endif

-- Role name = database name = prefix || service.
\set orchestrator_name :prefix orchestrator
\set inventory_name :prefix inventory
\set payment_name :prefix payment
\set shipping_name :prefix shipping

-- ------------------------------------------------------------ orchestrator
SELECT format('CREATE ROLE %I', :'orchestrator_name')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'orchestrator_name') \gexec
ALTER ROLE :"orchestrator_name" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
  NOREPLICATION NOBYPASSRLS PASSWORD :'orchestrator_password';
SELECT format('CREATE DATABASE %I OWNER %I', :'orchestrator_name', :'orchestrator_name')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'orchestrator_name') \gexec
ALTER DATABASE :"orchestrator_name" OWNER TO :"orchestrator_name";
REVOKE CONNECT, TEMPORARY, CREATE ON DATABASE :"orchestrator_name" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"orchestrator_name" TO :"orchestrator_name";

-- --------------------------------------------------------------- inventory
SELECT format('CREATE ROLE %I', :'inventory_name')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'inventory_name') \gexec
ALTER ROLE :"inventory_name" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
  NOREPLICATION NOBYPASSRLS PASSWORD :'inventory_password';
SELECT format('CREATE DATABASE %I OWNER %I', :'inventory_name', :'inventory_name')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'inventory_name') \gexec
ALTER DATABASE :"inventory_name" OWNER TO :"inventory_name";
REVOKE CONNECT, TEMPORARY, CREATE ON DATABASE :"inventory_name" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"inventory_name" TO :"inventory_name";

-- ----------------------------------------------------------------- payment
SELECT format('CREATE ROLE %I', :'payment_name')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'payment_name') \gexec
ALTER ROLE :"payment_name" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
  NOREPLICATION NOBYPASSRLS PASSWORD :'payment_password';
SELECT format('CREATE DATABASE %I OWNER %I', :'payment_name', :'payment_name')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'payment_name') \gexec
ALTER DATABASE :"payment_name" OWNER TO :"payment_name";
REVOKE CONNECT, TEMPORARY, CREATE ON DATABASE :"payment_name" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"payment_name" TO :"payment_name";

-- ---------------------------------------------------------------- shipping
SELECT format('CREATE ROLE %I', :'shipping_name')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'shipping_name') \gexec
ALTER ROLE :"shipping_name" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
  NOREPLICATION NOBYPASSRLS PASSWORD :'shipping_password';
SELECT format('CREATE DATABASE %I OWNER %I', :'shipping_name', :'shipping_name')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'shipping_name') \gexec
ALTER DATABASE :"shipping_name" OWNER TO :"shipping_name";
REVOKE CONNECT, TEMPORARY, CREATE ON DATABASE :"shipping_name" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"shipping_name" TO :"shipping_name";

-- Show the result: each database should list only its owner (and the
-- superuser) in its access privileges.
SELECT datname AS database, pg_get_userbyid(datdba) AS owner, datacl AS access
  FROM pg_database
 WHERE datname IN (:'orchestrator_name', :'inventory_name', :'payment_name', :'shipping_name')
 ORDER BY datname;
