#!/usr/bin/env python3
"""A Modbus TCP power meter for gridproxy's tests, served by pymodbus.

It meters a load it does not model itself: on every Modbus read it asks an
HTTP JSON source for the load now (the test's GPU load fixture,
`gridproxy_fixtures::gpu_load`) and answers with that figure, so the meter
follows the fixture's (time-scaled) profile exactly.

Register map (device id --unit, holding and input tables share it):
  0-1  load, kW, IEEE 754 float32, high word first
  2-3  load, W, unsigned 32-bit, high word first
Any other address answers ILLEGAL_ADDRESS (a real Modbus exception); a
source that cannot be read answers DEVICE_FAILURE.

Needs pymodbus 3.16 (pip): the SimDevice/SimData server API.
Listens on 127.0.0.1 only.

  python3 scripts/modbus_meter.py --port 15020 --source http://127.0.0.1:8080/meter
"""

import argparse
import asyncio
import json
import struct
import sys
import urllib.request

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice


def fetch_kw(url: str, pointer: str, timeout: float) -> float:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        doc = json.load(resp)
    for part in pointer.strip("/").split("/"):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    kw = float(doc)
    if kw != kw or kw < 0:
        raise ValueError(f"bad load {kw}")
    return kw


def registers(kw: float) -> list[int]:
    f_hi, f_lo = struct.unpack(">HH", struct.pack(">f", kw))
    w = min(int(round(kw * 1000.0)), 0xFFFFFFFF)
    return [f_hi, f_lo, (w >> 16) & 0xFFFF, w & 0xFFFF]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--unit", type=int, default=1)
    ap.add_argument("--source", required=True, help="HTTP JSON load source URL")
    ap.add_argument("--pointer", default="/power/kw", help="JSON pointer to kW")
    ap.add_argument("--source-timeout", type=float, default=0.5)
    args = ap.parse_args()

    async def action(function_code, start_address, address, count, current_registers, set_values):
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # a meter is read-only
        try:
            kw = await asyncio.to_thread(fetch_kw, args.source, args.pointer, args.source_timeout)
        except Exception as e:  # noqa: BLE001 - any source failure is a device failure
            print(f"modbus_meter: source: {e}", file=sys.stderr, flush=True)
            return ExcCodes.DEVICE_FAILURE
        regs = registers(kw)
        for i in range(len(current_registers)):
            j = start_address + i
            if 0 <= j < len(regs):
                current_registers[i] = regs[j]
        return None

    device = SimDevice(
        id=args.unit,
        simdata=[SimData(address=0, count=4, values=0, datatype=DataType.REGISTERS)],
        action=action,
    )
    server = ModbusTcpServer(device, address=("127.0.0.1", args.port))
    print(f"modbus_meter: listening on 127.0.0.1:{args.port} unit {args.unit}", flush=True)
    await server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
