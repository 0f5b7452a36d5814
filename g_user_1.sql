\set k random(1, 50000)
SELECT count(pg_advisory_xact_lock(29814, h)) AS n FROM (SELECT r, hashtext(r || ':' || k) AS h FROM (SELECT r, k, x FROM (SELECT 2 AS r, k::bigint::text AS k, true AS x FROM (SELECT t."pk_post" FROM "public"."tv_post" t WHERE t."fk_user" IN (SELECT unnest((SELECT ARRAY[:k]::bigint[])))) s(k)) l WHERE k IS NOT NULL) g ORDER BY r, h) o;
