"""Test helpers, imported as ``tests.helpers.<module>`` (tests/ is a package, so pytest puts the
repository root on sys.path); a helper shared by two test modules lives here, never in a test module:
tiny image trees and run configs (data), datamodule builders (datamodule), layer checks and dtypes
(layers), the literal references the layers are checked against (references), the backbones at test size
(models), tiny monitored models, trainers and event readers (monitoring), a free port (net), callbacks that
CLI subprocesses load by class path (cluster), a one-node SLURM cluster (slurm_cluster)."""
