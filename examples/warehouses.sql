-- Sample customer warehouses for the local cluster: three databases with a
-- little data each, and one login role per customer. e2e/install.sh runs this
-- against the warehouse PostgreSQL (passwords are set by install.sh).
CREATE DATABASE acme;
CREATE DATABASE globex;
CREATE DATABASE initech;
\connect acme
CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) NOT NULL, placed_at date NOT NULL);
INSERT INTO orders SELECT g, 'customer-' || (g % 17), round((g * 37 % 1000)::numeric / 3, 2), date '2026-01-01' + (g % 300) FROM generate_series(1, 500) g;
\connect globex
CREATE TABLE shipments (id int PRIMARY KEY, origin text NOT NULL, destination text NOT NULL, weight_kg int NOT NULL);
INSERT INTO shipments SELECT g, (ARRAY['Rotterdam','Hamburg','Antwerp'])[1 + g % 3], (ARRAY['Lyon','Milan','Vienna','Prague'])[1 + g % 4], 100 + g * 7 % 900 FROM generate_series(1, 300) g;
\connect initech
CREATE TABLE tps_reports (id int PRIMARY KEY, author text NOT NULL, filed_at timestamptz NOT NULL, has_cover_sheet bool NOT NULL);
INSERT INTO tps_reports SELECT g, 'employee-' || (g % 11), timestamptz '2026-03-01 09:00+00' + g * interval '1 hour', g % 5 <> 0 FROM generate_series(1, 200) g;
