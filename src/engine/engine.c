/* engine.c — helpers shared by every engine implementation. */
#include "engine/engine.h"

const char *bt_finish_reason_name(bt_finish_reason r) {
    switch (r) {
    case BT_FINISH_STOP: return "stop";
    case BT_FINISH_LENGTH: return "length";
    case BT_FINISH_CANCELLED: return "cancelled";
    }
    return "stop";
}
