from vmforge.cli.main import main

main()
