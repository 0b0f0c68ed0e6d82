from step8_router.server import main

main()
