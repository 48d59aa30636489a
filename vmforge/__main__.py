from vmforge.cli.entry import main

main()
