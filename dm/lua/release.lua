-- release: KEYS alloc hash, node hash, recent set; ARGV dep id
local old = redis.call('HGET', KEYS[1], ARGV[1])
local recent = redis.call('ZREM', KEYS[3], ARGV[1])
if not old then return 0 end
local a = cjson.decode(old)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_cpu', tostring(-a.cpu))
redis.call('HINCRBYFLOAT', KEYS[2], 'alloc_memory', tostring(-a.memory))
redis.call('HINCRBY', KEYS[2], 'alloc_n', -1)
if recent == 1 then
  redis.call('HINCRBYFLOAT', KEYS[2], 'res_cpu', tostring(-a.cpu))
  redis.call('HINCRBYFLOAT', KEYS[2], 'res_memory', tostring(-a.memory))
end
return 1
