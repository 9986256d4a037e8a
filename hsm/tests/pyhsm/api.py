# Drives pyhsm's API (python 2.7, pyhsm 1.2.1) against a YubiHSM 1 device path.
#
# Usage: python2.7 api.py DEVICE < ops.json
# ops.json is a list of operations, e.g. {"op": "echo", "data": "<hex>"};
# the output (stdout) is a JSON list with one result per operation:
# {"ok": ...} or {"error": "<message>", "status": <YSM status or null>}.
# Binary values are hex in both directions.
import json
import sys

import pyhsm
import pyhsm.base
import pyhsm.exception


def unhex(s):
    return str(s).decode('hex')


def run(hsm, op):
    name = op['op']
    if name == 'echo':
        return hsm.echo(unhex(op['data'])).encode('hex')
    if name == 'info':
        info = hsm.info()
        return {'major': info.version_major, 'minor': info.version_minor, 'build': info.version_build,
                'protocol': info.protocol_ver, 'system_uid': info.system_uid.encode('hex')}
    if name == 'random':
        return hsm.random(op['len']).encode('hex')
    if name == 'nonce':
        n = hsm.get_nonce(op['increment'])
        return {'volatile': n.volatile, 'pu_count': n.pu_count}
    if name == 'generate_aead_simple':
        aead = hsm.generate_aead_simple(unhex(op['nonce']), op['kh'], unhex(op['data']))
        return {'nonce': aead.nonce.encode('hex'), 'kh': aead.key_handle, 'aead': aead.data.encode('hex')}
    if name == 'generate_aead_random':
        aead = hsm.generate_aead_random(unhex(op['nonce']), op['kh'], op['len'])
        return {'nonce': aead.nonce.encode('hex'), 'kh': aead.key_handle, 'aead': aead.data.encode('hex')}
    if name == 'validate_aead':
        return hsm.validate_aead(unhex(op['nonce']), op['kh'], unhex(op['aead']), unhex(op['cleartext']))
    if name == 'validate_aead_otp':
        res = hsm.validate_aead_otp(unhex(op['public_id']), unhex(op['otp']), op['kh'], unhex(op['aead']))
        return {'use_ctr': res.use_ctr, 'session_ctr': res.session_ctr, 'ts_high': res.ts_high, 'ts_low': res.ts_low}
    if name == 'hmac_sha1':
        return hsm.hmac_sha1(op['kh'], unhex(op['data'])).get_hash().encode('hex')
    if name == 'unlock':
        return hsm.unlock(password=unhex(op['key']))
    raise ValueError('unknown op %r' % (name,))


def main():
    hsm = pyhsm.base.YHSM(device=sys.argv[1])
    out = []
    for op in json.load(sys.stdin):
        try:
            out.append({'ok': run(hsm, op)})
        except pyhsm.exception.YHSM_Error as e:
            out.append({'error': str(e), 'status': getattr(e, 'status', None)})
    json.dump(out, sys.stdout)
    sys.stdout.write('\n')


if __name__ == '__main__':
    main()
