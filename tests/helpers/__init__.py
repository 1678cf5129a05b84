"""Test helpers, imported as ``tests.helpers.<module>`` (tests/ is a package, so pytest puts the
repository root on sys.path): tiny image trees and run configs (data), callbacks that CLI
subprocesses load by class path (cluster), a one-node SLURM cluster (slurm_cluster), markers (run_if)."""
