-- allocate: KEYS alloc hash, node hash, recent set; ARGV dep id, cpu, memory, time, JSON.
-- The node hash keeps running totals: alloc_* of every allocation, res_* of the recent ones.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local a = cjson.decode(old)
  redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_cpu', tostring(-a.cpu))
  redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_memory', tostring(-a.memory))
  if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
    redis.call('HINCRBYFLOAT', KEYS[2], 'res_cpu', tostring(-a.cpu))
    redis.call('HINCRBYFLOAT', KEYS[2], 'res_memory', tostring(-a.memory))
  end
else
  redis.call('HINCRBY', KEYS[2], 'alloc_n', 1)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_cpu', ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_memory', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[2], 'res_cpu', ARGV[2])
redis.call('HINCRBYFLOAT', KEYS[2], 'res_memory', ARGV[3])
