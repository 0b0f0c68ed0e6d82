from step5_observability.server import main

main()
