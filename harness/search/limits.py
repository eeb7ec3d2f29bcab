"""A search's limits, apart from the code that checks them, so that `harness search --help` can
state them without importing torch or Optuna."""

# Optuna starts a thread per job, each training its own model beside the others in this one
# process: past a few per core they only wait on each other (and the GIL), and past the process's
# thread limit Optuna dies mid-search. More parallelism is more worker processes (scale-out).
MAX_N_JOBS = 64
# A stack holds every member's model, optimizer state and activations at once, and its K trials
# are all asked (RUNNING) before any trains: the stacks measured are 32 and 64 members (docs/searching.md,
# Stacked trials); 256 leaves room above them and refuses a K mistyped by a few zeros before
# a single trial is created.
MAX_BATCH = 256
MAX_STUDY_NAME = 250  # characters
# A long run (or trial) loses at most this much training to a crash; one shorter writes no checkpoint.
CHECKPOINT_SECONDS = 300.0
# `harness cluster` runs every worker and the tracking server's processes on this one machine, all
# on its PostgreSQL (max_connections=200, cluster.py): each search worker holds its storage's and
# its tracking connections, so past 64 the database refuses the next, and past a few per core they
# only wait on each other. Many more workers is many machines (docs/operations.md, Scaling out).
MAX_CLUSTER_WORKERS = 64
MAX_SERVER_WORKERS = 16
