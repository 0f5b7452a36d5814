-- tvproxy demo TVIEWs, created by `tvproxy demo` after conf/demo.sql (one create_tview call per
-- statement, in this order: a TVIEW may read the v_ view of one created before it).
-- Through the proxy the same statements work as plain SQL (CREATE TABLE tv_x AS SELECT ...), and
-- `tvproxy tview --dsn ... create "CREATE TABLE tv_x AS SELECT ..."` runs them directly.

CREATE TABLE tv_company AS
SELECT c.pk_company, c.id,
       jsonb_build_object('id', c.id, 'name', c.name, 'website', c.website) AS data
  FROM tb_company c;

-- fk_company is nullable (ON DELETE SET NULL): a LEFT JOIN keeps users without a company.
CREATE TABLE tv_user AS
SELECT u.pk_user, u.id, u.fk_company, v_company.id AS company_id,
       jsonb_build_object('id', u.id, 'name', u.name, 'email', u.email,
                          'company', v_company.data) AS data
  FROM tb_user u LEFT JOIN v_company ON v_company.pk_company = u.fk_company;

-- The author is embedded through v_user (and so its company through v_company); comments are
-- aggregated from tb_comment.  (Keep every other table out of the comment subquery: a join to
-- tb_user there would not be key-mapped to the posts it feeds.)
CREATE TABLE tv_post AS
SELECT p.pk_post, p.id, p.fk_user, v_user.id AS user_id,
       jsonb_build_object(
         'id', p.id, 'title', p.title, 'body', p.body, 'published_at', p.published_at,
         'author', v_user.data,
         'comments', COALESCE((
           SELECT jsonb_agg(jsonb_build_object('id', c.id, 'body', c.body)
                            ORDER BY c.pk_comment)
             FROM tb_comment c
            WHERE c.fk_post = p.pk_post), '[]'::jsonb)) AS data
  FROM tb_post p JOIN v_user ON v_user.pk_user = p.fk_user;
