// aedes on 127.0.0.1:PORT for Kiln's tests: `node server.cjs PORT`. Retained messages
// live in memory: a restart forgets them, like a mosquitto without persistence.
const net = require('net');
const { Aedes } = require('aedes');

(async () => {
  const broker = await Aedes.createBroker();
  // AEDES_DENY_SUBSCRIBE=FILTER[,FILTER]: those subscriptions are refused (SUBACK 0x80),
  // as a broker's ACL or a loaded cluster refuses them.
  const denied = new Set((process.env.AEDES_DENY_SUBSCRIBE || '').split(',').filter(Boolean));
  broker.authorizeSubscribe = (client, sub, callback) =>
    callback(null, denied.has(sub.topic) ? null : sub);
  const server = net.createServer(broker.handle);
  server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('aedes listening'));
})();
