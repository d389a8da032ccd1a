-- A lifelong jobs database of schema 1 (PRAGMA user_version 1, which a dump leaves out), written by
-- EntGAN 6f355d6's JobStore: one job, one deployed version with its figures. tests/test_lifelong_units.py
-- loads it to check the migration to the current schema.
BEGIN TRANSACTION;
CREATE TABLE decisions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job        TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    cycle      INTEGER NOT NULL,
    candidate  INTEGER NOT NULL,
    deployed   INTEGER,
    deploy     INTEGER NOT NULL,
    rule       TEXT NOT NULL,
    message    TEXT NOT NULL,
    figures    TEXT NOT NULL,
    at         REAL NOT NULL
);
INSERT INTO "decisions" VALUES(1,'digits',1,1,NULL,1,'rule','deploy: nothing is deployed yet','{"tasks": []}',1020.0);
CREATE TABLE evaluations (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    job       TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    cycle     INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    role      TEXT NOT NULL CHECK (role IN ('candidate', 'deployed')),
    task      TEXT NOT NULL,
    fid       REAL,
    fidelity  REAL,
    at        REAL NOT NULL
);
INSERT INTO "evaluations" VALUES(1,'digits',1,1,'candidate','A',55.5,0.5,1020.0);
INSERT INTO "evaluations" VALUES(2,'digits',1,1,'candidate','B',66.6,0.5,1020.0);
CREATE TABLE jobs (
    name         TEXT PRIMARY KEY,
    spec         TEXT NOT NULL,
    spec_path    TEXT,
    workdir      TEXT NOT NULL,
    created_at   REAL NOT NULL,
    stage        TEXT NOT NULL,
    state        TEXT NOT NULL,
    state_since  REAL NOT NULL,
    cycle        INTEGER NOT NULL DEFAULT 0,
    last_check_at REAL,
    last_check   TEXT
);
INSERT INTO "jobs" VALUES('digits','{"name":"digits","edge":{"tasks":[],"root":"/edge","holdout":0.25},"training":{"rounds":2,"seed":0,"workers_per_task":1,"image_size":28,"channels":1,"max_per_class":null,"replay_weight":1.0,"model":{"family":"mlp","latent_dim":8,"hidden_dim":16,"task_embedding_dim":4},"optimizer":{"batch_size":64,"lr_generator":0.0002,"lr_discriminator":0.0002,"beta1":0.5,"beta2":0.999},"aggregation":{"sync_every":1},"control":{"worker_scheduler":{"enabled":true,"d_steps":2,"fake_reuse":2,"other_task_fakes":0.25},"server_scheduler":{"enabled":true,"g_steps":3,"min_g_steps":2,"max_g_steps":8,"behind_below":0.3,"ahead_above":0.6,"g_batch_per_task":false,"participation":0.5},"noniid":{"enabled":true,"topology":"ring","every":1,"mixing":0.5,"method":"distill","weight":1.0,"steps":1},"overlap":{"enabled":true},"compression":{"enabled":false,"wire_dtype":"float16"},"memory":{"enabled":true,"generator_microbatch":16},"generator_average":{"enabled":false,"half_life_rounds":34.0}},"eval":{"every":5,"every_seconds":null,"samples_per_task":500,"classifier_epochs":4,"grid_size":64},"engine":{"backend":"auto","start_timeout_s":120.0,"round_timeout_s":300.0,"threads_per_process":1},"checkpoint":{"every":0,"keep":3}},"trigger":{"check_period_s":10.0,"combine":"or","conditions":[{"kind":"samples","at_least":5,"scope":"per-task"},{"kind":"metric","metric":"fid","operator":">","threshold":40.0,"task":"any"}]},"eval":{"samples_per_task":40,"seed":0},"deploy":{"metric":"fid","require":"every-task","min_improvement":0.0,"tolerance":0.25}}','/specs/digits.yaml','/jobs/digits',1000.0,'train','Ready',1002.0,1,1030.0,'{"fired": false, "detail": "or of 2 conditions", "parts": []}');
CREATE TABLE stage_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job         TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    cycle       INTEGER NOT NULL,
    stage       TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('starting', 'running', 'completed', 'failed', 'interrupted')),
    workdir     TEXT NOT NULL,
    pid         INTEGER,
    process_started REAL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    UNIQUE (job, cycle, stage, attempt)
);
INSERT INTO "stage_runs" VALUES(1,'digits',1,'train',1,'completed','/jobs/digits/cycle-0001/train-1',NULL,NULL,1003.0,1010.0);
INSERT INTO "stage_runs" VALUES(2,'digits',1,'eval',1,'completed','/jobs/digits/cycle-0001/eval-1',NULL,NULL,1011.0,1020.0);
CREATE TABLE tasks (
    job          TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    first_seen   REAL NOT NULL,
    samples      INTEGER,
    fingerprint  TEXT,
    last_version INTEGER,
    trained_at   REAL,
    PRIMARY KEY (job, name)
);
INSERT INTO "tasks" VALUES('digits','A',1001.0,12,'fa',1,1010.0);
INSERT INTO "tasks" VALUES('digits','B',1001.0,12,'fb',1,1010.0);
CREATE TABLE transitions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job         TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    at          REAL NOT NULL,
    cycle       INTEGER NOT NULL,
    from_stage  TEXT,
    from_state  TEXT,
    stage       TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    message     TEXT NOT NULL
);
INSERT INTO "transitions" VALUES(1,'digits',1000.0,0,NULL,NULL,'train','Waiting','JobCreated','job created from /specs/digits.yaml; the train stage waits for its trigger');
INSERT INTO "transitions" VALUES(2,'digits',1002.0,1,'train','Waiting','train','Ready','TriggerFired','fired');
CREATE TABLE versions (
    job         TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    cycle       INTEGER NOT NULL,
    parent      INTEGER,
    checkpoint  TEXT NOT NULL,
    run_dir     TEXT NOT NULL,
    tasks       TEXT NOT NULL,
    data        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('candidate', 'deployed', 'rejected', 'eval-failed', 'deploy-failed')),
    deployed    INTEGER NOT NULL DEFAULT 0,
    deployed_at REAL,
    PRIMARY KEY (job, version)
);
INSERT INTO "versions" VALUES('digits',1,1,NULL,'/jobs/digits/cycle-0001/train-1/run/checkpoints/latest.pt','/jobs/digits/cycle-0001/train-1/run','[{"name": "A", "samples": 12, "fingerprint": "fa", "train": 9, "holdout": 3}, {"name": "B", "samples": 12, "fingerprint": "fb", "train": 9, "holdout": 3}]','{"snapshot": {"root": "/x", "tasks": []}}',1010.0,'deployed',1,1021.0);
CREATE UNIQUE INDEX stage_completed_once ON stage_runs (job, cycle, stage) WHERE status = 'completed';
CREATE UNIQUE INDEX one_deployed_version ON versions (job) WHERE deployed = 1;
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('transitions',2);
INSERT INTO "sqlite_sequence" VALUES('stage_runs',2);
INSERT INTO "sqlite_sequence" VALUES('evaluations',2);
INSERT INTO "sqlite_sequence" VALUES('decisions',1);
COMMIT;
