-- The role Grafana's Postgres datasource signs in as: it may read what the Lathe dashboards
-- query (deploy/grafana/dashboards) and nothing else: no API keys, no token or secret hashes,
-- no files, and no writes. Grafana sends any viewer's panel SQL to Postgres as this role, so
-- the role, not the dashboard, is what bounds it.
--
-- Run it as the database owner once the controller has created the tables (its migrations run
-- at its first start), and again after an upgrade whose dashboards read more:
--
--   psql "$LATHE_DATABASE_URL" -v ON_ERROR_STOP=1 -f deploy/grafana/postgres-readonly.sql
--
-- docker-compose.yml runs it at every start (service grafana-role). The role is named by psql's
-- variable grafana_role (default lathe_grafana); where Postgres asks for passwords, give it one:
-- ALTER ROLE lathe_grafana PASSWORD '…'. tests/service/test_dashboards.py runs every panel and
-- annotation query of the dashboards as this role.
\if :{?grafana_role}
\else
  \set grafana_role lathe_grafana
\endif

SELECT format('CREATE ROLE %I LOGIN', :'grafana_role')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'grafana_role') \gexec

GRANT CONNECT ON DATABASE :"DBNAME" TO :"grafana_role";
GRANT USAGE ON SCHEMA public TO :"grafana_role";
GRANT SELECT ON jobs, attempts, metrics, evaluations TO :"grafana_role";
-- Workers: everything but the token hash.
GRANT SELECT (id, name, device_kind, gpu_name, gpu_memory_bytes, pools, version, registered_at,
              last_heartbeat_at, draining, revoked_at, left_at, slurm_job_id, pod_name)
  ON workers TO :"grafana_role";
