from maxdrop.cli import main

main()
