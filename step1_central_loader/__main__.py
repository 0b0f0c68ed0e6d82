from step1_central_loader.server import main

main()
