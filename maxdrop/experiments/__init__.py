"""Experiment tools on top of the CLI: ``maxdrop grid`` runs configs x seeds, several processes safely on one
root (:mod:`.grid`, :mod:`.claims`, :mod:`.progress`); ``maxdrop tune`` tunes knobs with Optuna (:mod:`.tune` and
its parts); ``maxdrop report`` tabulates, tests and plots the finished runs (:mod:`.report` and its parts
``report_runs``, ``report_stats``, ``report_plots``)."""
