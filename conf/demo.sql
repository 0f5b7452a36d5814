-- tvproxy demo schema: a small blog in the "trinity" convention.
--   tb_<entity>  normalised tables: pk_<entity> integer identity primary key, a public id uuid,
--                fk_<other> foreign keys.
-- The TVIEW engine builds read models on top of them: a view v_<entity> and a table
-- tv_<entity> (pk_<entity>, fk_*, id, data jsonb) that tvproxy keeps fresh at COMMIT.
-- Loaded into database "app" by `tvproxy demo`.

CREATE TABLE tb_company (
    pk_company integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    name text NOT NULL UNIQUE,
    website text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tb_user (
    pk_user integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    fk_company integer REFERENCES tb_company (pk_company) ON DELETE SET NULL,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON tb_user (fk_company);

CREATE TABLE tb_post (
    pk_post integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    fk_user integer NOT NULL REFERENCES tb_user (pk_user) ON DELETE CASCADE,
    title text NOT NULL,
    body text NOT NULL DEFAULT '',
    published_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON tb_post (fk_user);

CREATE TABLE tb_comment (
    pk_comment integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    fk_post integer NOT NULL REFERENCES tb_post (pk_post) ON DELETE CASCADE,
    fk_user integer NOT NULL REFERENCES tb_user (pk_user) ON DELETE CASCADE,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON tb_comment (fk_post);
CREATE INDEX ON tb_comment (fk_user);

INSERT INTO tb_company (name, website) VALUES
    ('Acme', 'https://acme.example'),
    ('Globex', 'https://globex.example');

INSERT INTO tb_user (fk_company, email, name) VALUES
    ((SELECT pk_company FROM tb_company WHERE name = 'Acme'), 'alice@acme.example', 'Alice'),
    ((SELECT pk_company FROM tb_company WHERE name = 'Acme'), 'bob@acme.example', 'Bob'),
    ((SELECT pk_company FROM tb_company WHERE name = 'Globex'), 'carol@globex.example', 'Carol');

INSERT INTO tb_post (fk_user, title, body, published_at) VALUES
    ((SELECT pk_user FROM tb_user WHERE email = 'alice@acme.example'),
     'Hello, TVIEWs', 'Read models that commit with their writes.', now()),
    ((SELECT pk_user FROM tb_user WHERE email = 'alice@acme.example'),
     'Transaction pooling', 'One server connection per transaction, not per client.', now()),
    ((SELECT pk_user FROM tb_user WHERE email = 'carol@globex.example'),
     'Drafts', 'Not published yet.', NULL);

INSERT INTO tb_comment (fk_post, fk_user, body) VALUES
    ((SELECT pk_post FROM tb_post WHERE title = 'Hello, TVIEWs'),
     (SELECT pk_user FROM tb_user WHERE email = 'bob@acme.example'), 'Nice!'),
    ((SELECT pk_post FROM tb_post WHERE title = 'Hello, TVIEWs'),
     (SELECT pk_user FROM tb_user WHERE email = 'carol@globex.example'), 'How does it handle 2PC?'),
    ((SELECT pk_post FROM tb_post WHERE title = 'Transaction pooling'),
     (SELECT pk_user FROM tb_user WHERE email = 'bob@acme.example'), 'PgBouncer-compatible, too.');
