from symrun.cli import main

main()
