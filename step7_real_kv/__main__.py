from step7_real_kv.server import main

main()
