from rose_pl.cli import main

main()
