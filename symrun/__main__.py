from symrun.cli import entry

entry()
