-- allocate (after node.lua): KEYS alloc hash, node hash, recent set; ARGV dep id, cpu, memory, time, JSON.
allocate(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
