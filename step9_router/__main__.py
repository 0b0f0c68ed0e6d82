from step9_router.server import main

main()
