"""Experiment tools on top of the CLI: ``maxdrop grid`` runs configs x seeds (:mod:`.grid`),
``maxdrop report`` tabulates, tests and plots the finished runs (:mod:`.report` and its parts
``report_runs``, ``report_stats``, ``report_plots``)."""
