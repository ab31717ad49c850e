from csml.cli.main import main

main()
