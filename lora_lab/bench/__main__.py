from lora_lab.bench.run import main

main()
