"""Sweeping and launching, with all of Hydra's glue: composing configs (composition), which configs
exist where (catalogue), the command line handed to Hydra (hydra_app), planning a grid into packs
(sweep), what `symrun sweep` does (launch), Hydra's task (job), and the sweep folder: paths and
files (results), writes that never follow a link (folder), run records read back (records) and
the tables (tables). hydra_plugins/symrun_sweeper is a thin entry point into launch."""
